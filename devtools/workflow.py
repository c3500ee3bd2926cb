"""UI-format (litegraph) workflows: build them, check their links, and convert them to the API
("prompt") form that POST /prompt takes — using the server's /object_info, like the frontend.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _spec_type(spec) -> str:
    t = spec[0]
    return "COMBO" if isinstance(t, list) else t


def _is_widget(spec) -> bool:
    return _spec_type(spec) in WIDGET_TYPES


def _has_control(spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate"))


def input_specs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's inputs in widget order (required, then optional)."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items() if k != "hidden"}
    out = []
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        out += [(name, specs[name]) for name in order.get(group, []) if name in specs]
    return out


class WorkflowError(ValueError):
    pass


def check_links(ui: dict, object_info: dict) -> None:
    """Every node type exists and every link's type matches both of its ends."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        if n["type"] not in VIRTUAL_NODES and n["type"] not in object_info:
            raise WorkflowError(f"node {n['id']}: type {n['type']!r} is not installed")
    for link_id, origin, oslot, target, tslot, ltype in ui["links"]:
        src, dst = nodes[origin], nodes[target]
        out_type = object_info[src["type"]]["output"][oslot]
        if out_type != ltype:
            raise WorkflowError(f"link {link_id}: {src['type']} output {oslot} is {out_type}, link says {ltype}")
        inp = dst["inputs"][tslot]
        if inp.get("link") != link_id:
            raise WorkflowError(f"link {link_id}: {dst['type']} input {inp['name']} does not point back to it")
        specs = dict(input_specs(object_info[dst["type"]]))
        if inp["name"] not in specs:
            raise WorkflowError(f"link {link_id}: {dst['type']} has no input {inp['name']!r}")
        in_type = _spec_type(specs[inp["name"]])
        if in_type not in (ltype, "*") and ltype != "*":
            raise WorkflowError(f"link {link_id}: {dst['type']}.{inp['name']} takes {in_type}, gets {ltype}")


def to_api(ui: dict, object_info: dict) -> dict:
    """The API prompt of a UI workflow (virtual nodes dropped; muted/bypassed nodes refused)."""
    links = {ln[0]: ln for ln in ui["links"]}
    prompt = {}
    for n in ui["nodes"]:
        if n["type"] in VIRTUAL_NODES:
            continue
        if n.get("mode", 0) != 0:
            raise WorkflowError(f"node {n['id']} ({n['type']}) is muted or bypassed; not supported here")
        info = object_info[n["type"]]
        linked = {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        values = list(n.get("widgets_values") or [])
        inputs, k = {}, 0
        for name, spec in input_specs(info):
            if _is_widget(spec):
                if k < len(values) and name not in linked:
                    inputs[name] = values[k]
                k += 1 + _has_control(spec)
            if name in linked:
                _, origin, oslot, _, _, _ = links[linked[name]]
                inputs[name] = [str(origin), oslot]
        prompt[str(n["id"])] = {
            "class_type": n["type"],
            "inputs": inputs,
            "_meta": {"title": n.get("title", n["type"])},
        }
    return prompt


# ---------------------------------------------------------------------------------------------
# Building UI workflows from a compact description (used to write workflows/*.json).
# ---------------------------------------------------------------------------------------------
@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] = (320, 130)
    text: str | None = None  # Note nodes


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[int, int, int, str]] = field(default_factory=list)  # (src id, src slot, dst id, dst input)
    groups: list[dict] = field(default_factory=list)

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    def link(self, src: Node, slot: int, dst: Node, name: str) -> None:
        self.edges.append((src.id, slot, dst.id, name))


def build_ui(graph: Graph, object_info: dict, cnr: dict[str, tuple[str, str]]) -> dict:
    """litegraph JSON for ``graph``. ``cnr`` maps node type → (cnr_id, version) for properties."""
    by_id = {n.id: n for n in graph.nodes}
    ui_nodes, ui_links = [], []
    inputs_of: dict[int, list[dict]] = {}
    outputs_of: dict[int, list[dict]] = {}
    for n in graph.nodes:
        if n.type in VIRTUAL_NODES:
            continue
        info = object_info[n.type]
        wired = {name for s, _, d, name in graph.edges if d == n.id}
        ins = []
        for name, spec in input_specs(info):
            if not _is_widget(spec):
                ins.append({"name": name, "type": _spec_type(spec), "link": None})
            elif name in wired:
                ins.append({"name": name, "type": _spec_type(spec), "widget": {"name": name}, "link": None})
        inputs_of[n.id] = ins
        outputs_of[n.id] = [
            {"name": nm, "type": t, "links": [], "slot_index": i}
            for i, (t, nm) in enumerate(zip(info["output"], info["output_name"]))
        ]
    for link_id, (s, slot, d, name) in enumerate(graph.edges, start=1):
        ltype = object_info[by_id[s].type]["output"][slot]
        dst_inputs = inputs_of[d]
        tslot = next(i for i, inp in enumerate(dst_inputs) if inp["name"] == name)
        dst_inputs[tslot]["link"] = link_id
        outputs_of[s][slot]["links"].append(link_id)
        ui_links.append([link_id, s, slot, d, tslot, ltype])
    order = _topo_order(graph)
    for n in graph.nodes:
        node = {
            "id": n.id,
            "type": n.type,
            "pos": list(n.pos),
            "size": list(n.size),
            "flags": {},
            "order": order.get(n.id, 0),
            "mode": 0,
        }
        if n.type in VIRTUAL_NODES:
            node.update(inputs=[], outputs=[], properties={}, widgets_values=[n.text or ""])
            node["color"], node["bgcolor"] = "#432", "#653"
        else:
            info = object_info[n.type]
            values = []
            for name, spec in input_specs(info):
                if _is_widget(spec):
                    if name not in n.widgets:
                        raise WorkflowError(f"{n.type}: no value given for widget {name!r}")
                    values.append(n.widgets[name])
                    if _has_control(spec):
                        values.append("fixed")
            unknown = set(n.widgets) - {name for name, _ in input_specs(info)}
            if unknown:
                raise WorkflowError(f"{n.type}: unknown widgets {sorted(unknown)}")
            cnr_id, ver = cnr.get(n.type, ("comfy-core", "0.3.75"))
            node.update(
                inputs=inputs_of[n.id],
                outputs=outputs_of[n.id],
                properties={"Node name for S&R": n.type, "cnr_id": cnr_id, "ver": ver},
                widgets_values=values,
            )
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    digest = hashlib.sha256("|".join(f"{n.id}:{n.type}" for n in graph.nodes).encode()).hexdigest()
    return {
        "id": f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}",
        "revision": 0,
        "last_node_id": max(n.id for n in graph.nodes),
        "last_link_id": len(ui_links),
        "nodes": ui_nodes,
        "links": ui_links,
        "groups": copy.deepcopy(graph.groups),
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}},
        "version": 0.4,
    }


def _topo_order(graph: Graph) -> dict[int, int]:
    deps = {n.id: {s for s, _, d, _ in graph.edges if d == n.id} for n in graph.nodes}
    order, done = {}, set()
    while len(done) < len(deps):
        ready = sorted(i for i, ds in deps.items() if i not in done and ds <= done)
        if not ready:
            raise WorkflowError("the graph has a cycle")
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order
