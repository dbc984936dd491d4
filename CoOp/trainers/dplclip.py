"""``DPLCLIP`` trainer: Domain Prompt Learning (Zhang et al., 2021) as used as a baseline by the official CRoFT code.

An MLP ``F`` (``MLP_DEPTH`` linear layers of width ``MLP_WIDTH``, each hidden layer followed by dropout
``MLP_DROPOUT`` and ReLU; Xavier-uniform weights, biases 0.01) turns the images of one domain into ``N_CTX``
domain tokens that replace the context of the prompt ``"X X ... X {classname}."``; CLIP stays frozen and only the
MLP trains (checkpoint model name ``DPL``). The images of a batch are grouped by their ``domain`` label and each
group gets its own domain tokens, hence its own C class text features:

* ``DOMAIN_POOL mean_of_mlp`` (default; the official code and the DPL paper): tokens of group g =
  mean over the group's images of ``F(raw image feature)``.
* ``DOMAIN_POOL mlp_of_mean``: tokens = ``F(mean of the group's L2-normalised image features)``.

Logits (``LOGITS``):

* ``concat`` (official default): every image is scored against the *concatenation* of all groups' class
  features (logits ``N x (G*C)``, groups in ascending domain-label order) while the cross-entropy labels stay in
  ``0..C-1``, so with more than one domain in a batch (every PACS training batch: three source domains) an image
  of the second or third domain is trained to match the *first* domain's prompts and the other groups' columns
  act as extra negatives. At evaluation a batch with several domains gives wider logits; collected logits of
  batches of different widths are padded with ``-inf`` (no effect on softmax, energy or argmax).
* ``per_group`` (named fix, what the DPL paper describes): each image is scored against its own domain group's
  C class features (logits ``N x C``). With a single group both modes are identical.

At inference the domain tokens come from the test batch itself (transductive, as in the official code): the
images of the batch are grouped by ``domain`` label (``TEST_GROUP_BY_DOMAIN True``, as the official
``sort_images`` at test time; a held-out-domain test batch is one group) or the whole batch forms one group
(``False``). Predictions therefore depend on the test batch size and composition (``DATALOADER.TEST.BATCH_SIZE``).
Outputs are returned in the loader's order (the official code reorders images by domain).

As officially, the MLP runs once per domain group, groups in ascending domain-label order (so the dropout draws
come in the official order), and the logits' columns are in group order; the rows stay in the loader's order (the
official code reorders them by group; the loss and the logits of each image are the same).

Inference returns ``InferenceOutput(logits, normalised image features)``. Precision as in
:mod:`trainers.prompt_trainer`: under ``PREC fp16`` the MLP is cast to fp16 with CLIP, as officially (named fix
``FP32_PARAMS True`` keeps it fp32). The official output width ``512 * N_CTX`` is the text width of RN50 /
ViT-B/16; here it is the loaded model's token-embedding width. The MLP's dropout can take its keep-masks from
``mask_source`` (see :class:`ReplayableDropout`; used to replay recorded masks).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from dassl.config.validate import PREC, Range, count
from dassl.engine import TRAINER_REGISTRY

from .prompt_trainer import PromptCLIPTrainer
from .prompting import PromptTokens, assemble_prompts, clip_embed_dim, encode_prompt_embeddings

DOMAIN_POOLS = ("mean_of_mlp", "mlp_of_mean")
LOGIT_MODES = ("concat", "per_group")


class ReplayableDropout(nn.Dropout):
    """``nn.Dropout`` whose keep-mask comes from ``mask_source`` when set (a callable ``x -> 0/1 mask shaped like
    x``, e.g. recorded masks); kept entries are scaled by ``1 / (1 - p)`` as torch does. None: torch's own draw."""

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self.mask_source: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask_source is None or not self.training or self.p == 0:
            return super().forward(x)
        keep = self.mask_source(x).to(device=x.device, dtype=x.dtype)
        if keep.shape != x.shape:
            raise ValueError(f"dropout mask_source gave shape {tuple(keep.shape)} for input {tuple(x.shape)}")
        return x * (keep / (1.0 - self.p))


class DomainPromptMLP(nn.Module):
    """``Linear(n_in, width) -> Dropout -> ReLU -> [Linear(width, width) -> Dropout -> ReLU] * (depth - 2)
    -> Linear(width, n_out)``."""

    def __init__(self, n_in: int, n_out: int, depth: int = 3, width: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.input = nn.Linear(n_in, width)
        self.dropout = ReplayableDropout(dropout)
        self.hiddens = nn.ModuleList([nn.Linear(width, width) for _ in range(depth - 2)])
        self.output = nn.Linear(width, n_out)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dropout(self.input(x)))
        for layer in self.hiddens:
            x = F.relu(self.dropout(layer(x)))
        return self.output(x)


class DomainPromptTokens(nn.Module):
    """Fixed pieces of ``"[SOS] X ... X {classname} . [EOS]"`` (buffers; not trained, not checkpointed)."""

    def __init__(self, clip_model: nn.Module, context_length: int, classnames: Sequence[str], n_ctx: int) -> None:
        super().__init__()
        pieces = PromptTokens(clip_model, context_length, classnames, " ".join(["X"] * n_ctx), n_ctx)
        self.register_buffer("token_prefix", pieces.prefix, persistent=False)
        self.register_buffer("token_suffix", pieces.suffix, persistent=False)
        self.register_buffer("tokenized_prompts", pieces.tokenized, persistent=False)
        self.name_lens = pieces.name_lens
        self.n_cls = len(classnames)
        self.n_ctx = n_ctx

    def forward(self, domain_tokens: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``[G, C, L, w]`` for domain tokens ``[G, M, w]``."""
        ctx = domain_tokens.unsqueeze(1).expand(-1, self.n_cls, -1, -1)
        return assemble_prompts(self.token_prefix, ctx, self.token_suffix, self.name_lens, "end")


def group_means(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Row means of ``values`` [N, K] per group index (``groups`` [N] in ``0..n_groups-1``) -> [n_groups, K]."""
    weights = F.one_hot(groups, n_groups).t().to(values.dtype)
    return (weights @ values) / weights.sum(dim=1, keepdim=True)


@TRAINER_REGISTRY.register()
class DPLCLIP(PromptCLIPTrainer):
    """Domain prompt learning: an MLP generates per-domain prompt tokens from the batch's image features."""

    CFG_RANGES = {"TRAINER.DPLCLIP.N_CTX": count(1), "TRAINER.DPLCLIP.PREC": PREC,
                  "TRAINER.DPLCLIP.MLP_DEPTH": count(2, "input and output layer"), "TRAINER.DPLCLIP.MLP_WIDTH": count(1),
                  "TRAINER.DPLCLIP.MLP_DROPOUT": Range(0.0, 1.0, hi_open=True),
                  "TRAINER.DPLCLIP.DOMAIN_POOL": Range(choices=DOMAIN_POOLS),
                  "TRAINER.DPLCLIP.LOGITS": Range(choices=LOGIT_MODES)}

    cfg_node = "DPLCLIP"
    model_name = "DPL"
    unsupported_keys = {"CTX_INIT": "", "CSC": False, "CLASS_TOKEN_POSITION": "end"}

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        c = cfg.TRAINER.DPLCLIP = CN()
        c.N_CTX = 16                     # number of domain tokens
        c.PREC = "fp16"                  # fp32 | fp16 | amp | bf16 (CPU: always fp32)
        c.FP32_PARAMS = False  # named fix: fp32 learnable parameters under fp16/bf16 (official: CLIP dtype)
        c.MLP_DEPTH = 3                  # official mlp_depth
        c.MLP_WIDTH = 512                # official mlp_width
        c.MLP_DROPOUT = 0.1              # official mlp_dropout
        c.DOMAIN_POOL = "mean_of_mlp"    # mean_of_mlp (official, paper) | mlp_of_mean
        c.TEST_GROUP_BY_DOMAIN = True    # inference: one group per domain label in the batch (official)
        c.LOGITS = "concat"              # concat (official: all groups' classes, labels 0..C-1) | per_group (fix)
        # official keys passed by the official scripts; only the defaults are supported (the MLP makes the context)
        c.CTX_INIT = ""
        c.CSC = False
        c.CLASS_TOKEN_POSITION = "end"

    def build_prompt_model(self, clip_model: nn.Module, classnames: list[str]) -> nn.Module:
        c = self.cfg.TRAINER.DPLCLIP
        n_ctx = int(c.N_CTX)
        self.width = clip_model.token_embedding.weight.shape[1]
        self.prompt_tokens = DomainPromptTokens(clip_model, self.context_length, classnames, n_ctx).to(self.device)
        print(f"DPLCLIP: {n_ctx} domain tokens, MLP depth {int(c.MLP_DEPTH)} width {int(c.MLP_WIDTH)} dropout "
              f"{float(c.MLP_DROPOUT)}, pooling {c.DOMAIN_POOL}, logits {c.LOGITS} (see the module docstring)")
        self.mlp = DomainPromptMLP(clip_embed_dim(clip_model), n_ctx * self.width, int(c.MLP_DEPTH),
                                   int(c.MLP_WIDTH), float(c.MLP_DROPOUT))
        return self.mlp

    # ------------------------------------------------------------------ batches
    def parse_batch_test(self, batch: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """Pass the domain labels on to :meth:`model_inference` (grouping at test time)."""
        img, label = batch["img"].to(self.device), batch["label"].to(self.device)
        if self.cfg.TRAINER.DPLCLIP.TEST_GROUP_BY_DOMAIN and "domain" in batch:
            return (img, batch["domain"].to(self.device)), label
        return img, label

    # ------------------------------------------------------------------ forward
    def domain_tokens(self, feats: torch.Tensor, raw: torch.Tensor, groups: torch.Tensor,
                      n_groups: int) -> torch.Tensor:
        """Domain tokens ``[G, M, w]`` of each group (``mean_of_mlp``: one MLP call per group, in group order)."""
        dtype = self.mlp.output.weight.dtype
        if self.cfg.TRAINER.DPLCLIP.DOMAIN_POOL == "mean_of_mlp":
            x = raw.to(dtype)
            tokens = torch.stack([self.mlp(x[groups == g]).mean(dim=0) for g in range(n_groups)])
        else:
            tokens = self.mlp(group_means(feats, groups, n_groups).to(dtype))
        return tokens.reshape(n_groups, self.prompt_tokens.n_ctx, self.width)

    def group_text_features(self, domain_tokens: torch.Tensor) -> torch.Tensor:
        """Normalised class text features ``[G, C, D]`` for each group's domain tokens."""
        pt = self.prompt_tokens
        tf = encode_prompt_embeddings(self.text_encoder, pt(domain_tokens), pt.tokenized_prompts)
        return tf / tf.norm(dim=-1, keepdim=True)

    @staticmethod
    def domain_groups(domains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The official ``sort_images`` grouping: the domain labels present (ascending) and each row's group."""
        present, groups = torch.unique(domains, return_inverse=True)
        return present, groups

    def forward_logits(self, feats: torch.Tensor, raw: torch.Tensor,
                       domains: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``concat``: ``logits[n, g*C + c] = s * cos(x_n, t_c(group g))``; ``per_group``: ``logits[n, c] =
        s * cos(x_n, t_c(group of n))``."""
        if domains is None:
            groups = torch.zeros(feats.shape[0], dtype=torch.long, device=feats.device)
            n_groups = 1
        else:
            present, groups = self.domain_groups(domains)
            n_groups = len(present)
        tf = self.group_text_features(self.domain_tokens(feats, raw, groups, n_groups))   # [G, C, D]
        x = feats.to(tf.dtype)
        if self.cfg.TRAINER.DPLCLIP.LOGITS == "concat":
            return self.logit_scale * x @ tf.reshape(-1, tf.shape[-1]).t()
        return self.logit_scale * torch.einsum("nd,ncd->nc", x, tf[groups])
