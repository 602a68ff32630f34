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

# model_type -> (path of the decoder layers inside the backbone, MLP-input module in a
# layer), or a list of them tried in order (the layout changed across transformers versions)
LAYOUTS = {
    "gpt2": ("h", "mlp"),
    "gpt_neox": ("layers", "mlp"),
    "opt": ("decoder.layers", "fc1"),
    "llama": ("layers", "mlp"), "mistral": ("layers", "mlp"),
    # Mixtral's sparse MoE block: `mlp` in transformers 5, `block_sparse_moe` in 4.x
    "mixtral": [("layers", "mlp"), ("layers", "block_sparse_moe")],
    # Gemma 3 (Gemma3ForConditionalGeneration, what AutoModelForCausalLM builds for it):
    # the text decoder sits in the multimodal backbone's language_model
    "gemma3": [("language_model.layers", "mlp"), ("layers", "mlp")],
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
    known = LAYOUTS.get(model_type)
    layouts = ([known] if isinstance(known, tuple) else known) if known else \
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
        # what the model's own forward does to its logits (Gemma 3's multimodal model does
        # not soft-cap, though its text config names a cap)
        self._transform, self.logit_note = logit_transform(c)
        # a multimodal model keeps the decoder's window in its text config
        c = c.get_text_config() if hasattr(c, "get_text_config") else c
        max_pos = next((getattr(c, k) for k in ("max_position_embeddings", "n_positions",
                                                "max_sequence_length", "max_seq_len") if getattr(c, k, None)),
                       DEFAULT_WINDOW)
        params = inspect.signature(self.backbone.forward).parameters
        # the KV-cache argument was renamed from past_key_values to cache in transformers 5
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cfg = SimpleNamespace(max_target_positions=int(max_pos),
                                   decoder_embed_dim=int(self.lm_head.weight.shape[1]),
                                   vocab_size=int(self.lm_head.weight.shape[0]),
                                   decoder_layers=len(self.layers),
                                   model_type=hf_model.config.model_type,
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
    first and last 4096 elements rounded to bf16 (cheap for multi-GB models). The values
    are the checkpoint's (its safetensors files) wherever the loaded tensor is that
    checkpoint's tensor cast to the model's dtype, so the same checkpoint loaded in fp32,
    bf16 or fp16 has one fingerprint; a tensor changed in memory is read from memory. A
    model loaded from files counts the values of the tensors the files hold under the
    same name; the others (tensors transformers fuses or renames at load, such as
    Mixtral's experts in transformers 5) by name and shape only."""
    c = model.config
    stored = _stored_weights(model)
    h = hashlib.sha256(f"{c.model_type}{c.vocab_size}".encode())
    state = model.state_dict()
    # the files may name a tensor otherwise: wrapper prefixes in another order (Gemma 3's
    # model.language_model.* is language_model.model.* in its files)
    loose: dict = {}
    for n in stored:
        loose.setdefault(_loose_name(n), []).append(n)
    def source(n: str) -> str | None:
        if n in stored:
            return n
        alike = loose.get(_loose_name(n), [])
        return alike[0] if len(alike) == 1 else None
    found = {n: source(n) for n in state}
    by_storage = {t.data_ptr(): found[n] for n, t in state.items() if found[n]}
    for name, t in sorted(state.items()):
        flat = t.detach().reshape(-1)
        parts = (flat[:4096], flat[-4096:])
        src = found[name] or by_storage.get(t.data_ptr())   # tied weights: their source's
        if src is not None:
            kept = stored[src](t.shape, t.numel())
            if kept is not None and all(torch.equal(k.to(p.dtype).to(p.device), p)
                                        for k, p in zip(kept, parts)):
                parts = kept
        elif stored:          # not in the files as such: its values depend on the dtype
            parts = ()
        h.update(f"{name}{tuple(t.shape)}".encode())
        for part in parts:
            h.update(part.to("cpu", torch.bfloat16).to(torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def _loose_name(name: str) -> str:
    """A tensor name without its ``model`` path components."""
    return ".".join(p for p in name.split(".") if p != "model")


def _stored_weights(model: nn.Module) -> dict:
    """{tensor name: read(shape, numel) -> (first 4096, last 4096) flat elements as stored,
    or None when the file's tensor has another size} over the safetensors files of the
    local directory the model was loaded from ({} when there is none)."""
    where = Path(str(getattr(model, "name_or_path", "") or getattr(model.config,
                                                                     "_name_or_path", "")))
    files = sorted(where.glob("*.safetensors")) if where.is_dir() else []
    if not files:
        return {}
    from safetensors import safe_open
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                out[name] = (lambda n, path: lambda shape, numel: _ends(path, n, shape, numel))(
                    name, str(f))
    return out


def _ends(path: str, name: str, shape: tuple, numel: int) -> tuple | None:
    """The first and last 4096 flat elements of tensor ``name`` of a safetensors file,
    read by slicing along its first axis (not the whole tensor); None when its shape is
    not ``shape``."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as fh:
        sl = fh.get_slice(name)
        if tuple(sl.get_shape()) != tuple(shape):
            return None
        if len(shape) == 0:
            t = fh.get_tensor(name).reshape(-1)
            return t[:4096], t[-4096:]
        row = max(1, numel // max(1, shape[0]))
        n = min(shape[0], -(-4096 // row))
        return sl[:n].reshape(-1)[:4096], sl[shape[0] - n:].reshape(-1)[-4096:]


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

    def ids_only(tok: Tokenizer) -> str:
        """The tokenizer without its padding and truncation settings (they change no id)."""
        tok.no_padding()
        tok.no_truncation()
        return tok.to_str()
    ours = ids_only(Tokenizer.from_file(str(databin.path / databin.meta["tokenizer"]["file"])))
    if ids_only(Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())) != ours:
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
