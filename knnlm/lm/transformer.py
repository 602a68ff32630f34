"""A decoder-only Transformer LM covering fairseq's ``transformer_lm`` family.

Pre-LN or post-LN layers, optional final LayerNorm, sinusoidal or learned positions, ReLU
or GELU, tied or untied output embedding, dropout / attention / activation dropout.

The forward pass can return, in the same pass, the two representations kNN-LM retrieves
with (see the paper notes, section 2):

- ``att``: the exact tensor fed into the LAST layer's FFN (after its LayerNorm in a pre-LN
  layer; the post-attention LayerNorm output in a post-LN layer);
- ``ffn``: the exact tensor fed into the output projection (after the final LayerNorm when
  the model has one);
- ``layer:N``: the output of layer N (0-based; negative counts from the end), before the
  final LayerNorm (so ``layer:-1`` is ``ffn`` only for models without one).

Shapes: tokens (B, L) int64 -> features (B, L, D); ``output_layer`` maps (…, D) -> (…, V).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import heads

REPRESENTATIONS = ("att", "ffn")


@dataclass
class ModelConfig:
    vocab_size: int
    decoder_layers: int = 2
    decoder_embed_dim: int = 32
    decoder_ffn_embed_dim: int = 64
    decoder_attention_heads: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_fn: str = "relu"
    decoder_normalize_before: bool = True
    no_decoder_final_norm: bool = False
    decoder_learned_pos: bool = False
    max_target_positions: int = 1024
    share_decoder_input_output_embed: bool = False
    no_scale_embedding: bool = False
    padding_idx: int = 1
    # output head (lm/heads.py); the defaults are the standard softmax over ffn
    softmax_input: str = "ffn"
    pseudo_vocab_ratio: int = 1
    num_extra_embed: list[int] | None = None
    k_mos: int = 1
    additional_linear: bool = False
    use_l2: bool = False
    norm_l2: bool = False
    num_special_tokens: int = 4     # fairseq's nspecial: one row each with pseudo_vocab_ratio
    # a softmax over C centroid rows mapped to tokens by a stored P(w | c) with nnz entries
    # (train --load-centroids; the fork's centroid fine-tuning)
    centroid_rows: int = 0
    centroid_nnz: int = 0
    # 2: the original fork's head layouts (pseudo-vocabulary rows in blocks after the
    # specials; MoS projections without tanh, prior with a bias); 1: knnlm 0.1's (tiled
    # rows; tanh; no prior bias). Checkpoints without the field were written by 0.1.
    head_version: int = 2

    def __post_init__(self):
        if self.decoder_embed_dim % self.decoder_attention_heads:
            raise ValueError("decoder_embed_dim must be divisible by decoder_attention_heads")
        if self.activation_fn not in ("relu", "gelu"):
            raise ValueError(f"activation_fn must be relu or gelu, not {self.activation_fn}")
        if self.softmax_input not in REPRESENTATIONS:
            raise ValueError(f"softmax_input must be att or ffn, not {self.softmax_input!r}")
        if self.pseudo_vocab_ratio < 1 or self.k_mos < 1:
            raise ValueError("pseudo_vocab_ratio and k_mos must be >= 1")
        if self.num_extra_embed is not None and self.pseudo_vocab_ratio > 1:
            raise ValueError("pseudo_vocab_ratio and num_extra_embed are exclusive")
        if self.head_version not in (1, 2) or self.num_special_tokens < 0:
            raise ValueError("head_version must be 1 or 2 and num_special_tokens >= 0")
        if self.centroid_rows < 0 or self.centroid_nnz < 0 or (self.centroid_rows > 0) != \
                (self.centroid_nnz > 0):
            raise ValueError("centroid_rows and centroid_nnz must both be > 0, or both 0")
        if self.centroid_rows and (self.pseudo_vocab_ratio > 1 or self.num_extra_embed is not None
                                   or self.k_mos > 1 or self.additional_linear):
            raise ValueError("a centroid head has none of pseudo_vocab_ratio, num_extra_embed, "
                             "k_mos and additional_linear")
        if self.share_decoder_input_output_embed and self.output_rows != self.vocab_size:
            raise ValueError("a tied output embedding has exactly one row per token")

    @property
    def output_rows(self) -> int:
        """R, the rows of the output embedding (V for the standard head)."""
        if self.centroid_rows:
            return self.centroid_rows
        if self.num_extra_embed is not None:
            return self.vocab_size + sum(self.num_extra_embed)
        if self.head_version == 1:
            return self.vocab_size * self.pseudo_vocab_ratio
        s = min(self.num_special_tokens, self.vocab_size)
        return s + self.pseudo_vocab_ratio * (self.vocab_size - s)

    @property
    def standard_head(self) -> bool:
        """The plain softmax(W_sm · ffn): output_layer returns raw logits."""
        return (not self.centroid_rows and self.output_rows == self.vocab_size
                and self.k_mos == 1 and not self.use_l2
                and not self.norm_l2 and not self.additional_linear
                and self.softmax_input == "ffn")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("head_version", 1)     # written before the field existed
        return cls(**kw)


# Presets (fairseq ``--arch`` names). Values not given keep the ModelConfig defaults.
ARCHS: dict[str, dict] = {
    # The paper's WikiText-103 BPE model.
    "transformer_lm_wikibpe": dict(
        decoder_layers=16, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096,
        decoder_attention_heads=8, dropout=0.3, attention_dropout=0.1, activation_dropout=0.1,
        decoder_normalize_before=True, no_decoder_final_norm=True,
        share_decoder_input_output_embed=False, max_target_positions=3072),
    "transformer_lm_gpt2_small": dict(
        decoder_layers=24, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096,
        decoder_attention_heads=16, dropout=0.1, attention_dropout=0.1, activation_fn="gelu",
        max_target_positions=1024),
    "transformer_lm": dict(
        decoder_layers=6, decoder_embed_dim=512, decoder_ffn_embed_dim=2048,
        decoder_attention_heads=8, dropout=0.1),
    # CPU-sized models: `small` for the demo (a few M parameters), `tiny` for tests.
    "small": dict(decoder_layers=4, decoder_embed_dim=128, decoder_ffn_embed_dim=512,
                  decoder_attention_heads=4, dropout=0.1, max_target_positions=1024),
    "tiny": dict(decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                 decoder_attention_heads=2, dropout=0.1, max_target_positions=512),
}


def sinusoidal_table(n: int, dim: int) -> torch.Tensor:
    """(n, dim) fairseq-style sinusoidal table: [sin | cos] halves."""
    half = dim // 2
    scale = math.log(10000) / max(1, half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -scale)
    ang = torch.arange(n, dtype=torch.float32)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(n, 1)], dim=1)
    return table


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.decoder_embed_dim
        self.n_heads = cfg.decoder_attention_heads
        self.pre_ln = cfg.decoder_normalize_before
        self.qkv = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.decoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = F.relu if cfg.activation_fn == "relu" else F.gelu
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)
        self.attention_dropout = cfg.attention_dropout

    def attention(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """Causal self-attention; with ``cache`` (a dict, filled in place) the keys and
        values of earlier calls are attended to and this call's are appended."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        p = self.attention_dropout if self.training else 0.0
        past = 0
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:  # query i (absolute position past + i) sees keys 0 .. past + i
            mask = torch.ones(L, past + L, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation_dropout(self.act(self.fc1(h)))))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, ffn_input): the second is the exact tensor fed into ``fc1``."""
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.self_attn_layer_norm(x), cache))
            h = self.final_layer_norm(x)
            return x + self.ffn(h), h
        x = self.self_attn_layer_norm(x + self.dropout(self.attention(x, cache)))
        return self.final_layer_norm(x + self.ffn(x)), x


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder_embed_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.padding_idx)
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(d)
        if cfg.decoder_learned_pos:
            self.embed_positions = nn.Embedding(cfg.max_target_positions, d)
        else:
            self.register_buffer("sinusoidal", sinusoidal_table(cfg.max_target_positions, d),
                                 persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        use_final = cfg.decoder_normalize_before and not cfg.no_decoder_final_norm
        self.layer_norm = nn.LayerNorm(d) if use_final else None
        if not cfg.share_decoder_input_output_embed:
            self.output_projection = nn.Linear(d, cfg.output_rows, bias=False)
        self.register_buffer("row_token", heads.row_token_map(
            cfg.vocab_size, cfg.pseudo_vocab_ratio, cfg.num_extra_embed, cfg.num_special_tokens,
            tiled=cfg.head_version == 1), persistent=False)
        if cfg.k_mos > 1:
            self.mos_proj = nn.Linear(d, cfg.k_mos * d)
            self.mos_prior = nn.Linear(d, cfg.k_mos, bias=cfg.head_version >= 2)
        if cfg.additional_linear:
            self.additional_linear = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.centroid_rows:   # P(w | c) as COO (centroid, token) pairs and probabilities
            self.register_buffer("centroid_index",
                                 torch.zeros(2, cfg.centroid_nnz, dtype=torch.long))
            self.register_buffer("centroid_prob", torch.zeros(cfg.centroid_nnz))
            self._dist_cache = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.cfg.decoder_embed_dim
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=d ** -0.5)
        nn.init.zeros_(self.embed_tokens.weight[self.cfg.padding_idx])
        for layer in self.layers:
            for lin in (layer.qkv, layer.out_proj, layer.fc1, layer.fc2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        if not self.cfg.share_decoder_input_output_embed:
            nn.init.normal_(self.output_projection.weight, mean=0.0, std=d ** -0.5)
        if self.cfg.additional_linear:  # zero: training starts from the base model
            nn.init.zeros_(self.additional_linear.weight)
        if self.cfg.k_mos > 1:
            # the fork's k projections Linear(d, d) and prior Linear(d, k), initialised as
            # fairseq's Linear(): xavier-uniform weights (each projection on its own fan),
            # zero biases
            with torch.no_grad():
                for block in self.mos_proj.weight.view(self.cfg.k_mos, d, d):
                    nn.init.xavier_uniform_(block)
                nn.init.zeros_(self.mos_proj.bias)
                nn.init.xavier_uniform_(self.mos_prior.weight)
                if self.mos_prior.bias is not None:
                    nn.init.zeros_(self.mos_prior.bias)

    # parameter-name prefixes of the output head (the rest is the body)
    HEAD_PARAMS = ("output_projection.", "mos_proj.", "mos_prior.", "additional_linear.")

    @property
    def output_weight(self) -> torch.Tensor:
        """W_sm, the (R, D) output embedding (R = V for the standard head)."""
        if self.cfg.share_decoder_input_output_embed:
            return self.embed_tokens.weight
        return self.output_projection.weight

    @property
    def head_inputs(self) -> tuple[str, ...]:
        """The representations :meth:`output_layer` reads, in the order packed into
        ``features``: the main head's input, then ``att`` for the additional linear."""
        return (self.cfg.softmax_input,) + (("att",) if self.cfg.additional_linear else ())

    def output_layer(self, features: torch.Tensor) -> torch.Tensor:
        """(…, D·len(head_inputs)) features -> (…, V) logits: raw logits for the standard
        head, normalised log-probs for the others (their log_softmax is themselves)."""
        c = self.cfg
        if c.standard_head:
            return F.linear(features, self.output_weight)
        lead, d = features.shape[:-1], c.decoder_embed_dim
        f = features.reshape(-1, features.shape[-1])
        h = f[:, :d]
        if c.centroid_rows:
            out = heads.centroid_log_probs(h, self.output_weight, self.centroid_dist_t(), 1.0,
                                           c.use_l2, c.norm_l2)
            return out.view(*lead, -1)
        if c.k_mos > 1:
            ctx = self.mos_proj(h)
            if c.head_version == 1:
                ctx = torch.tanh(ctx)
            ctx = ctx.view(len(h) * c.k_mos, d)
            comp = heads.head_log_probs(ctx, self.output_weight, self.row_token, c.vocab_size,
                                        c.use_l2, c.norm_l2).view(len(h), c.k_mos, -1)
            out = heads.mixture_log_probs(self.mos_prior(h).float(), comp)
        else:
            out = heads.head_log_probs(h, self.output_weight, self.row_token, c.vocab_size,
                                       c.use_l2, c.norm_l2)
        if c.additional_linear:  # added as logits to the main head's (log-)logits
            out = torch.log_softmax(out + self.additional_linear(f[:, d:2 * d]).float(), -1)
        return out.view(*lead, -1)

    def centroid_dist_t(self) -> torch.Tensor:
        """The centroid head's (V, C) P(w | c) transpose in CSR, rebuilt when the buffers
        change (loading, moving to another device)."""
        key = (self.centroid_index.data_ptr(), self.centroid_prob.data_ptr(),
               self.centroid_index._version, self.centroid_prob._version)
        if self._dist_cache is None or self._dist_cache[0] != key:
            self._dist_cache = (key, heads.centroid_dist_t(
                self.centroid_index, self.centroid_prob,
                (self.cfg.centroid_rows, self.cfg.vocab_size)))
        return self._dist_cache[1]

    def new_cache(self) -> list[dict]:
        """An empty key/value cache for :meth:`forward`."""
        return [{} for _ in self.layers]

    def _layer_index(self, name: str) -> int:
        n = len(self.layers)
        try:
            i = int(name.split(":", 1)[1])
        except (IndexError, ValueError):
            raise ValueError(f"bad representation name {name!r} (att, ffn or layer:N)")
        if not -n <= i < n:
            raise ValueError(f"{name}: the model has {n} layers")
        return i % n

    def forward(self, tokens: torch.Tensor, return_hidden: tuple[str, ...] = (),
                cache: list[dict] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens (B, L) -> (features, {name: (B, L, D)} for ``return_hidden``).

        ``features`` is the input of :meth:`output_layer`: ``ffn`` (B, L, D) for the
        standard head; the :attr:`head_inputs` concatenated on the last axis otherwise.
        ``cache``: one dict per layer (see :meth:`new_cache`), extended in place, so that
        generation feeds each new token alone.
        """
        B, L = tokens.shape
        past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        if past + L > self.cfg.max_target_positions:
            raise ValueError(f"input of {past + L} tokens exceeds max_target_positions "
                             f"{self.cfg.max_target_positions}")
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.cfg.decoder_learned_pos:
            x = x + self.embed_positions.weight[past:past + L]
        else:
            x = x + self.sinusoidal[past:past + L].to(x.dtype)
        x = self.dropout(x)
        wanted_layers = {self._layer_index(n): n for n in return_hidden if n.startswith("layer:")}
        hidden: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x, ffn_input = layer(x, cache[i] if cache is not None else None)
            if i in wanted_layers:
                hidden[wanted_layers[i]] = x
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        reps = dict(att=ffn_input, ffn=x)
        hidden.update({n: reps[n] for n in return_hidden if n in reps})
        unknown = set(return_hidden) - set(hidden)
        if unknown:
            raise ValueError(f"unknown representation(s) {sorted(unknown)} (att, ffn or layer:N)")
        if self.cfg.standard_head:
            return x, hidden
        return torch.cat([reps[n] for n in self.head_inputs], dim=-1), hidden


def build_model(arch: str, vocab_size: int, padding_idx: int = 1, **overrides) -> TransformerLM:
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    params = dict(ARCHS[arch])
    params.update({k: v for k, v in overrides.items() if v is not None})
    return TransformerLM(ModelConfig(vocab_size=vocab_size, padding_idx=padding_idx, **params))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
