"""HuggingFace causal LMs behind the interface of our own Transformer (`--hf-model`).

``model(tokens, return_hidden)`` returns ``(ffn, {name: tensor})`` and
``model.output_layer(ffn)`` the logits, as :class:`~knnlm.lm.transformer.TransformerLM`
does, so eval-lm, build-dstore, the kNN-LM and generation use either unchanged.

The representations (paper notes §2):

- ``ffn``: the final hidden state after the final norm, the input of the LM head: the
  backbone's ``last_hidden_state`` (the head is applied separately, only where needed);
- ``att``: the input of the last decoder layer's MLP (after its pre-MLP norm), captured by
  a forward pre-hook on that module, registered for one call and always removed;
- ``layer:N``: the output of decoder layer N (0-based, negative from the end), captured by a
  forward hook on the layer: before any final norm, as for our own Transformer (the last
  entry of HF's ``hidden_states`` has the final norm applied; ``ffn`` is that state).

The model's ``forward`` is never patched or replaced. Transformers is an optional extra
(``pip install -e .[hf]``); models load offline from a local directory or the HF cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from ..guard import temp_path
from ..hub import first_line, load_hf_tokenizer, pretrained_args, transformers_module
from ..util import UserError

# model_type -> (path of the decoder layers inside the backbone, MLP-input module in a layer)
LAYOUTS = {
    "gpt2": ("h", "mlp"),
    "gpt_neox": ("layers", "mlp"),
    "opt": ("decoder.layers", "fc1"),
    "llama": ("layers", "mlp"), "mistral": ("layers", "mlp"), "mixtral": ("layers", "mlp"),
    "qwen2": ("layers", "mlp"), "qwen3": ("layers", "mlp"), "gemma": ("layers", "mlp"),
    "gemma2": ("layers", "mlp"), "gemma3_text": ("layers", "mlp"), "phi3": ("layers", "mlp"),
    "olmo": ("layers", "mlp"), "olmo2": ("layers", "mlp"), "granite": ("layers", "mlp"),
    "cohere": ("layers", "mlp"), "cohere2": ("layers", "mlp"), "falcon": ("h", "mlp"),
    "bloom": ("h", "mlp"), "gptj": ("h", "mlp"), "gpt_bigcode": ("h", "mlp"),
    "mpt": ("blocks", "ffn"),
}
DEFAULT_WINDOW = 2048    # the longest default input: max positions can be 131,072
FALLBACK_LAYERS = ("layers", "h", "decoder.layers", "blocks")
FALLBACK_MLP = ("mlp", "feed_forward", "ffn", "fc1")


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def locate_modules(backbone: nn.Module, model_type: str) -> tuple[nn.ModuleList, nn.Module]:
    """(decoder layers, MLP-input module of the last layer); a UserError naming what was
    expected when the family's layout is unknown."""
    layouts = [LAYOUTS[model_type]] if model_type in LAYOUTS else \
        [(l, m) for l in FALLBACK_LAYERS for m in FALLBACK_MLP]
    for layers_path, mlp_name in layouts:
        layers = _get(backbone, layers_path)
        if isinstance(layers, nn.ModuleList) and len(layers):
            mlp = getattr(layers[-1], mlp_name, None)
            if isinstance(mlp, nn.Module):
                return layers, mlp
    expected = ", ".join(f"{l}[-1].{m}" for l, m in layouts[:8])
    raise UserError(f"cannot locate the last decoder layer's MLP of model type {model_type!r} "
                    f"(expected one of: {expected}, inside {type(backbone).__name__})")


@contextlib.contextmanager
def capture_output(module: nn.Module, store: dict, name: str):
    """Record the (first) output of ``module`` under ``store[name]`` while the context is
    open; the hook is removed on exit, whatever happens."""
    def hook(_mod, _args, out):
        store[name] = out[0] if isinstance(out, (tuple, list)) else out
    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_input(module: nn.Module, store: dict, name: str):
    """Record the first positional input of ``module`` under ``store[name]`` while the
    context is open; the hook is removed on exit, whatever happens."""
    def hook(_mod, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        store[name] = x
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def logit_transform(config) -> tuple[object, str]:
    """(function, description) of what the family does to ``lm_head(ffn)`` before its
    logits: Gemma 2/3 soft-capping, Granite's division, Cohere's scale; (None, "") when
    nothing. :meth:`HFCausalLM.check_logits` proves the result equals the model's own."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        return (lambda x: torch.tanh(x / cap) * cap), f"tanh soft-capping at {cap:g}"
    scaling = getattr(config, "logits_scaling", None)
    if scaling and scaling != 1:
        return (lambda x: x / scaling), f"divided by logits_scaling {scaling:g}"
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        return (lambda x: x * scale), f"times logit_scale {scale:g}"
    return None, ""


class HFCausalLM(nn.Module):
    """An HF ``*ForCausalLM`` model seen as a knnlm LM."""

    def __init__(self, hf_model: nn.Module, name: str):
        super().__init__()
        self.hf = hf_model
        self.name = name
        self.backbone = hf_model.base_model
        self.lm_head = hf_model.get_output_embeddings()
        if self.lm_head is None:
            raise UserError(f"{name} has no LM head (get_output_embeddings() is None)")
        c = hf_model.config
        self.layers, self.att_module = locate_modules(self.backbone, c.model_type)
        self._transform, self.logit_note = logit_transform(c)
        max_pos = next((getattr(c, k) for k in ("max_position_embeddings", "n_positions",
                                                "max_sequence_length", "max_seq_len") if getattr(c, k, None)),
                       DEFAULT_WINDOW)
        params = inspect.signature(self.backbone.forward).parameters
        # the KV-cache argument was renamed from past_key_values to cache in transformers 5
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cfg = SimpleNamespace(max_target_positions=int(max_pos),
                                   decoder_embed_dim=int(self.lm_head.weight.shape[1]),
                                   vocab_size=int(self.lm_head.weight.shape[0]),
                                   decoder_layers=len(self.layers), model_type=c.model_type,
                                   default_window=min(int(max_pos), DEFAULT_WINDOW))

    def forward(self, tokens: torch.Tensor, return_hidden: tuple[str, ...] = (),
                past=None, use_cache: bool = False):
        """tokens (B, L) -> (ffn (B, L, D), {name: (B, L, D)}); with ``use_cache`` the
        backbone's KV cache is returned under ``hidden["past"]`` (pass it back as ``past``
        to continue)."""
        store: dict = {}
        layer_ids = {}
        for n in return_hidden:
            if n.startswith("layer:"):
                i = int(n.split(":", 1)[1])
                if not -len(self.layers) <= i < len(self.layers):
                    raise ValueError(f"{n}: the model has {len(self.layers)} layers")
                layer_ids[n] = i % len(self.layers)
            elif n not in ("att", "ffn"):
                raise ValueError(f"unknown representation {n!r} (att, ffn or layer:N)")
        with contextlib.ExitStack() as hooks:
            if "att" in return_hidden:
                hooks.enter_context(capture_input(self.att_module, store, "att"))
            for n, i in layer_ids.items():
                hooks.enter_context(capture_output(self.layers[i], store, n))
            kw = {self._cache_arg: past} if past is not None else {}
            out = self.backbone(input_ids=tokens, use_cache=use_cache, **kw)
        ffn = out.last_hidden_state
        hidden = {n: store[n] for n in layer_ids}
        if "att" in return_hidden:  # some families (OPT) flatten (B, L) before the MLP
            hidden["att"] = store["att"].reshape(*ffn.shape[:-1], -1)
        if "ffn" in return_hidden:
            hidden["ffn"] = ffn
        if use_cache:
            hidden["past"] = out[self._cache_arg]
        return ffn, hidden

    def output_layer(self, features: torch.Tensor) -> torch.Tensor:
        """The model's logits of final hidden states: its LM head, then whatever its family
        does to them (:func:`logit_transform`)."""
        logits = self.lm_head(features)
        return self._transform(logits) if self._transform is not None else logits

    @torch.no_grad()
    def check_logits(self, n_tokens: int = 12) -> None:
        """Refuse a model whose own forward computes logits that ``output_layer(ffn)``
        does not reproduce (a family post-processing them in a way not known here):
        one short forward both ways, compared to float rounding."""
        p = next(self.hf.parameters())
        ids = (torch.arange(n_tokens, device=p.device) * 7 + 3) % self.cfg.vocab_size
        ffn, _ = self(ids[None])
        ours = self.output_layer(ffn).float()
        theirs = self.hf(input_ids=ids[None]).logits.float()
        tol = (1e-4 if p.dtype == torch.float32 else 3e-2) * (1 + float(theirs.abs().max()))
        err = float((ours - theirs).abs().max())
        if not err <= tol:
            raise UserError(f"{self.name} ({self.cfg.model_type}): the LM head over the final "
                            f"hidden state differs from the model's own logits by {err:.3g}; "
                            "this family post-processes its logits in a way knnlm does not "
                            "reproduce")


def hf_fingerprint(model: nn.Module) -> str:
    """A short identity of the weights: every tensor's name and shape and the values of its
    first and last 4096 elements rounded to bf16 (cheap for multi-GB models, and the same
    whether the model was loaded in fp32, fp16 or bf16)."""
    c = model.config
    h = hashlib.sha256(f"{c.model_type}{c.vocab_size}".encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}".encode())
        for part in (flat[:4096], flat[-4096:]):
            h.update(part.to("cpu", torch.bfloat16).to(torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def check_hf_data(model: HFCausalLM, databin) -> None:
    """Refuse a data-bin tokenized with another vocabulary than the model's: ids beyond
    its embedding, or (when the model directory has a tokenizer) another tokenizer."""
    if databin.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{databin.path} has {databin.vocab_size:,} token ids; {model.name} "
                        f"embeds only {model.cfg.vocab_size:,}")
    try:
        hf_tok = load_hf_tokenizer(model.name)
    except UserError:
        return  # no tokenizer next to the weights: the id range check is all there is
    from tokenizers import Tokenizer
    ours = Tokenizer.from_file(str(databin.path / databin.meta["tokenizer"]["file"])).to_str()
    if Tokenizer.from_str(hf_tok.backend_tokenizer.to_str()).to_str() != ours:
        raise UserError(f"{databin.path} was not tokenized with {model.name}'s tokenizer "
                        f"(make it with knnlm preprocess --hf-tokenizer {model.name})")


def load_hf_model(name: str, dtype: torch.dtype | None = None) -> HFCausalLM:
    """From a local directory or the HF cache; offline unless downloads are allowed."""
    tf = transformers_module()
    where, kwargs = pretrained_args(name)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot load HF model {name!r} offline ({first_line(exc)})")
    lm = HFCausalLM(model.eval(), name)
    lm.check_logits()
    return lm


def save_hf_model(name: str, out_dir: str | Path) -> dict:
    """A local copy of an HF model and its tokenizer (safetensors), e.g. a GGUF file
    dequantized once so that every later stage loads it fast. Skipped when ``out_dir``
    holds one already; written to a temporary directory first, then renamed."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        print(f"{out}: the model is already saved")
        return dict(path=str(out))
    tf = transformers_module()
    where, kwargs = pretrained_args(name)
    tok = load_hf_tokenizer(name)
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot load HF model {name!r} offline ({first_line(exc)})")
    if "gguf_file" in kwargs:
        # transformers dequantizes GGUF weights to fp32 at load but keeps the quantizer,
        # which refuses to save: the fp32 tensors are what gets saved, so drop it
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {name} ({model.config.model_type}, {n / 1e6:,.1f}M parameters) to {out}")
    return dict(path=str(out), parameters=n, source=name)
