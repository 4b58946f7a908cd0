"""
LoRA adapters for fine-tuning [Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685]: a frozen Linear W [out, in] gets a trainable low-rank update,

    y = x @ W^T + dropout(x) @ A^T @ B^T * (alpha / r),    A: [r, in], B: [out, r]

A starts Kaiming-uniform and B at zero, so a fresh adapter leaves the model unchanged (PEFT's
default init). Merging folds the update into the weight: W <- W + (alpha / r) * B @ A.

On disk an adapter is a directory in the layout of Hugging Face PEFT (huggingface/peft, LoRA):
    adapter_config.json        peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors  "base_model.model.<module path>.lora_A.weight" [r, in] and
                               ".lora_B.weight" [out, r], fp32
so `peft.LoraConfig.from_pretrained(dir)` reads the config and PEFT's set_peft_model_state_dict
loads the tensors into a PEFT-wrapped GPT. target_modules are module-path suffixes such as
"attn.c_proj" (PEFT matches a name equal to an entry or ending in "." + entry; a bare "c_proj" would
hit the MLP's projection too).

Like gpt.Linear, the adapter's factors are fp32 parameters cast to the input's dtype at use. The base
product runs through gpt.Linear.forward unchanged, so the engine's CPU decode path
(kernels.decoding / small_linear) still serves it, and the two small adapter products too.
"""

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import NanochatError, atomic_write_bytes
from nanochat.gpt import Linear

# --lora-targets names -> the module-path suffix of that Linear inside each transformer block
TARGETS = {"q": "attn.c_q", "k": "attn.c_k", "v": "attn.c_v", "o": "attn.c_proj", "fc": "mlp.c_fc", "down": "mlp.c_proj"}
DEFAULT_TARGETS = "q,k,v,o,fc"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the GPT)


@dataclass(frozen=True)
class LoraSpec:
    """An adapter's shape: rank r, alpha (the update is scaled by alpha / r), target names (keys of
    TARGETS, in TARGETS order) and the dropout on the adapter's input while training."""

    rank: int
    alpha: float
    targets: tuple
    dropout: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise NanochatError(f"--lora-rank {self.rank} must be an integer >= 1")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise NanochatError(f"--lora-alpha {self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise NanochatError(f"--lora-dropout {self.dropout} is not in [0, 1)")
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def scale(self):
        return self.alpha / self.rank

    def to_dict(self):
        return asdict(self) | {"targets": list(self.targets)}


def parse_targets(value):
    """--lora-targets "q,k,v,o,fc" (or a list of names) -> the names in TARGETS order. Raises
    NanochatError for an empty list or an unknown name."""
    names = [t.strip() for t in value.split(",")] if isinstance(value, str) else [str(t) for t in value]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise NanochatError(f"--lora-targets {value if isinstance(value, str) else ','.join(names)!r}: expected a comma-separated list of {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


class LoraLinear(Linear):
    """
    A gpt.Linear with a LoRA adapter. It shares the frozen base weight Parameter of the Linear it
    replaces (same module path, so the base state-dict keys do not change) and adds lora_A
    (gpt.Linear in -> r, weight [r, in]) and lora_B (gpt.Linear r -> out, weight [out, r]).
    forward(x [..., in]) -> [..., out] in x's dtype.
    """

    def __init__(self, base, spec):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        self.scale, self.dropout = spec.scale, spec.dropout
        device = base.weight.device
        self.lora_A = Linear(self.in_features, spec.rank).to(device)
        self.lora_B = Linear(spec.rank, self.out_features).to(device)
        with torch.no_grad():  # PEFT's init: A as nn.Linear's default (Kaiming-uniform, a = sqrt(5)), B = 0
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            self.lora_B.weight.zero_()

    def forward(self, x):
        y = super().forward(x)  # the base product, with gpt.Linear's decode fast path
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        # the scale on the [..., r] activation, not the [..., out] one, and added in place: y (F.linear's
        # output) is not saved for backward, so this spares two output-sized temporaries per call
        return y.add_(self.lora_B(self.lora_A(x) * self.scale))


def lora_modules(model):
    """{module path: LoraLinear} of the model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def apply_lora(model, spec):
    """
    Freeze every parameter of the GPT `model` (requires_grad False) and put a fresh adapter
    (LoraSpec) on each block's target Linears, on the weights' device. Returns the adapter's
    parameters (lora_A, lora_B per target, fp32, trainable), in module order. Raises NanochatError
    if the model already has adapters (merge them first) or a target matches no module.
    """
    if lora_modules(model):
        raise NanochatError("the model already has LoRA adapters: merge them (lora.merge_lora) before adding another")
    model.requires_grad_(False)
    suffixes = ["." + TARGETS[t] for t in spec.targets]
    names = [n for n, m in model.named_modules() if isinstance(m, Linear) and any(n.endswith(s) for s in suffixes)]
    if len(names) != len(spec.targets) * model.config.n_layer:
        raise NanochatError(f"LoRA targets {','.join(spec.targets)} match {len(names)} modules, expected {len(spec.targets) * model.config.n_layer}")
    for name in names:
        _replace(model, name, LoraLinear(model.get_submodule(name), spec))
    return lora_parameters(model)


def lora_parameters(model):
    """The adapter parameters of the model (lora_A then lora_B weight of each adapted Linear)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight, W <- W + scale * B @ A (fp32), and put the plain
    gpt.Linear back. requires_grad of the base weights is left as it is. Returns the model."""
    for name, m in lora_modules(model).items():
        m.weight.add_(m.lora_B.weight.float() @ m.lora_A.weight.float(), alpha=m.scale)
        with torch.device("meta"):  # no allocation: the weight is replaced by the merged one
            plain = Linear(m.in_features, m.out_features)
        plain.weight = m.weight
        _replace(model, name, plain)
    return model


def adapter_state_dict(model):
    """The adapter tensors under PEFT's key names: {"base_model.model.<path>.lora_A.weight": [r, in],
    "...lora_B.weight": [out, r]}, fp32, detached, contiguous (as safetensors wants them)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous()
    return out


def adapter_config(spec, base_model=None):
    """adapter_config.json's fields as PEFT's LoraConfig names them; base_model: a reference to
    the model the adapter was trained on (the parent checkpoint's directory)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": [TARGETS[t] for t in spec.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def write_adapter(directory, state, spec, base_model=None):
    """Write an adapter directory (created if missing): adapter_config.json and
    adapter_model.safetensors, each atomically (temp file + rename). state: adapter_state_dict()."""
    from safetensors.torch import save

    os.makedirs(directory, exist_ok=True)
    atomic_write_bytes(os.path.join(directory, WEIGHTS_NAME), save({k: v.cpu() for k, v in state.items()}, metadata={"format": "pt"}))
    atomic_write_bytes(os.path.join(directory, CONFIG_NAME), json.dumps(adapter_config(spec, base_model), indent=2).encode())


def save_adapter(directory, model, spec, base_model=None):
    """write_adapter() of the model's adapters."""
    write_adapter(directory, adapter_state_dict(model), spec, base_model)


def read_adapter(directory, device="cpu"):
    """
    An adapter directory -> (LoraSpec, state dict with PEFT key names on device). Raises
    NanochatError (one line naming the file) when adapter_config.json or the weights are missing or
    unreadable, or the config is not a LoRA adapter this model family can take (target modules
    outside TARGETS, per-layer rank or alpha patterns, DoRA, rsLoRA, bias).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise NanochatError(f"{directory} is not a LoRA adapter: no {CONFIG_NAME} in it")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError:
        raise NanochatError(f"{config_path}: not valid JSON") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise NanochatError(f"{config_path}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}, expected 'LORA'")
    suffix_to_name = {v: k for k, v in TARGETS.items()}
    modules = config.get("target_modules")
    if not isinstance(modules, list) or not modules or any(m not in suffix_to_name for m in modules):
        raise NanochatError(f"{config_path}: target_modules {modules!r} are not a list of {', '.join(TARGETS.values())}")
    for key, ok in (("rank_pattern", None), ("alpha_pattern", None), ("use_dora", False), ("use_rslora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if config.get(key) not in (ok, {} if ok is None else ok):
            raise NanochatError(f"{config_path}: {key}={config[key]!r} is not supported")
    try:
        spec = LoraSpec(int(config["r"]), float(config["lora_alpha"]), [suffix_to_name[m] for m in modules], float(config.get("lora_dropout") or 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise NanochatError(f"{config_path}: bad or missing r / lora_alpha / lora_dropout ({e})") from None
    if not os.path.isfile(weights_path):
        raise NanochatError(f"{directory}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    try:
        state = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise NanochatError(f"{weights_path}: unreadable ({str(e).splitlines()[0]})") from None
    return spec, state


@torch.no_grad()
def load_adapter(directory, model, merge=False):
    """
    Put the adapter saved in `directory` on the GPT `model` (apply_lora with its spec, then its
    tensors); merge=True folds it into the weights at once (merge_lora). Returns the LoraSpec.
    Raises NanochatError (one line) for a directory read_adapter refuses, or tensors whose names or
    shapes do not fit this model (another depth or width, other targets).
    """
    spec, state = read_adapter(directory, model.lm_head.weight.device)
    apply_lora(model, spec)
    ours = adapter_state_dict(model)
    missing, extra = sorted(ours.keys() - state.keys()), sorted(state.keys() - ours.keys())
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model lacks"
        raise NanochatError(f"{directory}: the adapter does not fit this model: it {what} ({len(missing)} missing, {len(extra)} unexpected tensors)")
    for name, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            t, w = state[f"{PEFT_PREFIX}{name}.{part}.weight"], getattr(m, part).weight
            if t.shape != w.shape:
                raise NanochatError(f"{directory}: the adapter does not fit this model: {name}.{part} is {tuple(t.shape)}, the model needs {tuple(w.shape)}")
            w.copy_(t)
    if merge:
        merge_lora(model)
    return spec

