"""Zero-shot table of the tiny CLIP on DigitsDG-mini (accuracy per domain, MSP AUROC against the open sets)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from demo.data import CLASSNAMES, DIGITS_FOLDER, DOMAINS, FASHION_FOLDER, FASHION_SPLIT, TEXTURES_FOLDER, TEXTURES_SPLIT
from demo.pretrain.digits import load_domain, load_openset
from demo.pretrain.model import to_model_input
from demo.pretrain.train import EVAL_TEMPLATE, TRAIN_TEMPLATES


@torch.no_grad()
def text_features(model: torch.nn.Module, tokenizer: Any, templates: list[str]) -> torch.Tensor:
    """(n_classes, D) L2-normalised text features, averaged over templates (one encoder call)."""
    f = model.encode_text(tokenizer([t.format(c) for c in CLASSNAMES for t in templates]), normalize=True)
    return F.normalize(f.view(len(CLASSNAMES), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def image_features(model: torch.nn.Module, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    return torch.cat([model.encode_image(to_model_input(images[i:i + batch]), normalize=True)
                      for i in range(0, len(images), batch)])


def msp_auroc(model: torch.nn.Module, t_single: torch.Tensor, id_msp: np.ndarray, data_root: Path,
              size: int) -> dict[str, float]:
    """MSP AUROC (%) of the mnist domain (ID) against each open-set folder that is built."""
    from sklearn.metrics import roc_auc_score

    out, scale = {}, float(model.logit_scale.exp())
    for folder, split in ((FASHION_FOLDER, FASHION_SPLIT), (TEXTURES_FOLDER, TEXTURES_SPLIT)):
        if not (data_root / folder / split).is_file():
            continue
        ood = load_openset(data_root, folder, split, size)
        ood_msp = torch.softmax(scale * (image_features(model, ood) @ t_single.t()), 1).max(1).values.numpy()
        y = np.r_[np.ones(len(id_msp)), np.zeros(len(ood_msp))]
        out[folder] = round(100.0 * float(roc_auc_score(y, np.r_[id_msp, ood_msp])), 2)
    return out


@torch.no_grad()
def evaluate_zero_shot(model: torch.nn.Module, tokenizer: Any, data_root: str | Path,
                       verbose: bool = True) -> dict:
    """Zero-shot accuracy (%) per domain with EVAL_TEMPLATE and with the template ensemble, and MSP AUROC (%)
    of the mnist domain (ID) against each open-set folder."""
    model.eval()
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, tuple) else size)
    t_single, t_ens = text_features(model, tokenizer, [EVAL_TEMPLATE]), text_features(model, tokenizer, TRAIN_TEMPLATES)
    res: dict[str, Any] = {"template": EVAL_TEMPLATE, "accuracy": {}, "accuracy_ensemble": {}, "n_images": {}}
    id_msp: Optional[np.ndarray] = None
    for dom in DOMAINS:
        imgs, labels = load_domain(data_root, dom, size)
        f = image_features(model, imgs)
        logits = f @ t_single.t()
        res["accuracy"][dom] = round(100.0 * float((logits.argmax(1).numpy() == labels).mean()), 2)
        res["accuracy_ensemble"][dom] = round(100.0 * float(((f @ t_ens.t()).argmax(1).numpy() == labels).mean()), 2)
        res["n_images"][dom] = int(len(labels))
        if dom == "mnist":
            id_msp = torch.softmax(float(model.logit_scale.exp()) * logits, 1).max(1).values.numpy()
    res["msp_auroc_vs_mnist"] = msp_auroc(model, t_single, id_msp, Path(data_root), size)
    if verbose:
        print(format_table(res))
    return res


def format_table(res: dict) -> str:
    lines = [f"zero-shot accuracy (%) on DigitsDG-mini, prompt \"{res['template']}\" / template ensemble",
             f"{'domain':<12}{'images':>8}{'prompt':>9}{'ensemble':>10}"]
    for dom, acc in res["accuracy"].items():
        lines.append(f"{dom:<12}{res['n_images'][dom]:>8}{acc:>9.2f}{res['accuracy_ensemble'][dom]:>10.2f}")
    for folder, auroc in res.get("msp_auroc_vs_mnist", {}).items():
        lines.append(f"MSP AUROC mnist (ID) vs {folder}: {auroc:.2f}")
    return "\n".join(lines)


def digits_built(data_root: Optional[str | Path]) -> bool:
    return data_root is not None and (Path(data_root) / DIGITS_FOLDER).is_dir()
