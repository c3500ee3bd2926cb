"""comfyui-glance core library (ComfyUI is imported inside functions; the nodes in ``nodes/`` are thin wrappers).

One module per idea:

- ``architectures``: the table of supported model families (FLUX, Qwen-Image): official hyper-parameters,
  target layers, norm/projection paths, presets; the only place that tests a model's class.
- ``schedules``: Glance Slow/Fast sigma schedules and the official Qwen-Image stepping (pure maths).
- ``official``: the released Qwen-Image stepping as a ComfyUI sampler.
- ``guidance``: Qwen-Image's norm-rescaled true CFG.
- ``lora_files``: safe, cached loading of LoRA safetensors from a model folder.
- ``lora_layer``: the one forward-LoRA mechanism: named low-rank adapters applied by one hook per layer.
- ``experts``: LoRA files parsed into Slow/Fast adapters, switched by sigma inside one sampling run.
- ``checkpoint``: autograd through a frozen ComfyUI model (training switch, block checkpoint, weight swap).
- ``rollouts``: the Euler helper, the fine grid and the teacher trajectories.
- ``training``: one expert's training run (jobs, noise/target pairs, ``train_expert``).
- ``lora_save``: save plan, all-or-nothing writes and metadata of trained LoRAs.
- ``oneshot``: the One-Shot Trainer's job from inputs to outputs.
- ``plots``: the loss curve as an IMAGE.
- ``arcflow``: ArcFlow's momentum-mixture maths and the policy object (pure torch).
- ``arcflow_model``: ArcFlow heads attached to a ComfyUI model by object patches.
- ``arcflow_sampler``: ArcFlow's sampling loop (a k-diffusion-style sampler function).
- ``arcflow_distill``: data-free distillation of an ArcFlow adapter.
- ``reference_model``: the pack's small pixel-space reference teacher.
"""

__version__ = "0.1.0"


class GlanceError(ValueError):
    """A user-facing error: the message names the problem and the fix."""
