"""The reference teacher's scenes and its prompt-following score (pure numpy/scipy, no ComfyUI)."""

import numpy as np
import pytest

from glance_core import scenes


def _rendered(captions: list[str], seeds: int) -> tuple[np.ndarray, list[str]]:
    imgs = [scenes.render(c, 1000 + s) for c in captions for s in range(seeds)]
    return np.stack(imgs), [c for c in captions for _ in range(seeds)]


@pytest.mark.parametrize("split", ["seen", "held-out"])
def test_ground_truth_scenes_score_at_least_098_in_every_category(split):
    captions = scenes.seen_captions() if split == "seen" else scenes.held_out_captions()
    imgs, caps = _rendered(captions, 12)
    result = scenes.score(imgs, caps)
    # held-out compositions all name a colour: no 'single object' / 'two objects' captions there
    assert set(result) == {*scenes.CATEGORIES, "overall"} - (
        {"single object", "two objects"} if split != "seen" else set()
    )
    assert result["overall"] >= 0.98, result
    assert min(result.values()) >= 0.9, result


def test_noise_and_wrong_captions_score_about_zero():
    imgs, caps = _rendered(scenes.seen_captions(), 4)
    rng = np.random.default_rng(0)
    assert scenes.score(rng.uniform(0, 1, imgs.shape), caps)["overall"] <= 0.02
    assert scenes.score(np.full_like(imgs, 0.5), caps)["overall"] == 0.0
    # the same images under a caption that differs in one thing: colour, shape, count or relation
    swapped = {
        "a red circle": "a blue circle",
        "a blue triangle": "a blue square",
        "two red circles": "three red circles",
        "a red circle left of a blue square": "a red circle right of a blue square",
        "a red square and a blue circle": "a blue square and a red circle",
    }
    for right, wrong in swapped.items():
        img = np.stack([scenes.render(right, s) for s in range(8)])
        assert scenes.score(img, [right] * 8)["overall"] == 1.0
        assert scenes.score(img, [wrong] * 8)["overall"] == 0.0, wrong


def test_relation_rate_tells_a_teacher_that_follows_relations_from_one_that_ignores_them():
    """bench_teacher's position diagnostic: ground truth holds the relation every time, the opposite relation never,
    and objects in random cells sit at the chance level it prints beside the teacher's rate."""
    captions = [c for c in scenes.seen_captions() + scenes.held_out_captions() if scenes.parse(c).relation]
    imgs, caps = _rendered(captions, 6)
    assert scenes.relation_rate(imgs, caps) == (1.0, len(caps))
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    flipped = [c.replace(r, opposite[r]) for c in caps for r in [scenes.parse(c).relation]]
    assert scenes.relation_rate(imgs, flipped) == (0.0, len(caps))
    # colour and single-object captions have no relation: not counted
    assert scenes.relation_rate(imgs[:2], ["a red circle", "a circle"]) == (0.0, 0)
    chance = scenes.relation_chance(captions)
    assert 0.2 < chance < 0.5, chance
    with pytest.raises(ValueError, match="position captions"):
        scenes.relation_chance(["a red circle"])


def test_training_never_draws_the_held_out_compositions():
    rng = np.random.default_rng(1)
    for _ in range(400):
        spec = scenes.random_spec(rng)
        assert not scenes.is_held_out(spec), spec.caption
        drawn = scenes.layout(spec, rng, allow_held_out=False)
        assert all((p.colour, p.shape) not in scenes.HELD_OUT_PAIRS for p in drawn)
    assert all(scenes.is_held_out(scenes.parse(c)) for c in scenes.held_out_captions())
    assert not any(scenes.is_held_out(scenes.parse(c)) for c in scenes.seen_captions())
    imgs, caps = scenes.training_batch(64, rng)
    assert imgs.shape == (64, scenes.SIZE, scenes.SIZE, 3) and 0 <= imgs.min() and imgs.max() <= 1
    assert scenes.score(imgs, caps)["overall"] >= 0.9
    assert all(len(c.split()) <= scenes.MAX_WORDS and set(c.split()) <= set(scenes.VOCAB) for c in caps)


def test_captions_round_trip_and_bad_captions_name_the_grammar():
    for c in scenes.seen_captions() + scenes.held_out_captions():
        assert scenes.parse(c).caption == c
    assert scenes.parse("Two RED circles").category == "counting"
    for bad in ("a dog", "four red circles", "a red circle and a red circle left", "a circle and a blue square"):
        with pytest.raises(ValueError, match="not a scene caption.*left of"):
            scenes.parse(bad)


def test_every_object_is_one_phrase_token():
    """The teacher takes a caption as phrases (one context token each): every object of every caption kind is one
    phrase with its own colour and shape words, so a colour is bound to its shape before the model sees it."""
    from glance_core import reference_model

    vocab, starts = scenes.VOCAB, list(scenes.PHRASE_STARTS)
    rng = np.random.default_rng(2)
    captions = scenes.seen_captions() + scenes.held_out_captions()
    captions += [scenes.random_spec(rng).caption for _ in range(200)]
    for c in captions:
        groups = reference_model.groups(vocab, c, scenes.MAX_PHRASES, starts)
        assert len(groups) == scenes.MAX_PHRASES, c
        phrases = [" ".join(vocab[i] for i in g) for g in groups if g != [0]]
        spec = scenes.parse(c)
        objects = [p for p in phrases if p.split()[-1].rstrip("s") in scenes.SHAPES]
        assert len(objects) == (1 if spec.category == "counting" else len(spec.objects)), (c, phrases)
        for obj, phrase in zip(spec.objects, objects):
            assert obj.shape in phrase and (obj.colour is None or obj.colour in phrase.split()), (c, phrases)
    assert reference_model.groups(vocab, "", scenes.MAX_PHRASES, starts) == [[0]] * scenes.MAX_PHRASES
    with pytest.raises(reference_model.GlanceError, match="5 phrases; .* at most 3"):
        reference_model.groups(vocab, "a red circle left of a blue square and a triangle", 3, starts)
    # files trained one token per word still encode that way
    assert reference_model.groups(vocab, "a red circle", 4) == [[1], [vocab.index("red")], [vocab.index("circle")], [0]]
