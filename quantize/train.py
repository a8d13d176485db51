"""Train ``lavt-tiny`` on ShapesRef (text encoder frozen), resumable.

The whole split is decoded once into uint8 tensors (on the training device when it has room), so a step is pure
tensor work: sample a batch with a seeded generator, normalise, run the frozen text encoder without gradients, run
the vision + fusion + decoder part, cross-entropy + Dice loss, AdamW. The learning rate follows a cosine over the
planned steps, or over ``max_minutes`` when that ends first, so a time-boxed run still ends annealed.
A checkpoint (weights, optimiser, step, sampler state) is written atomically every ``save_every`` steps and at the
end; ``resume=True`` continues from it.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .atomic import atomic_file
from .data.preprocess import normalize_image
from .data.refer import ReferDataset
from .data.splits import open_split
from .devices import resolve_device
from .models.checkpoint import load_state_dict_checked, save_state_dict
from .models.registry import build_model
from .progress import progress_bar

__all__ = ["TRAINING_KIND", "TrainConfig", "preload_split", "train"]

# The kind recorded in a training folder's manifest: only such a folder is resumed into.
TRAINING_KIND = "training"

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data_root: str
    out_dir: str
    model: str = "lavt-tiny"
    steps: int = 20000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 500
    seed: int = 0
    device: str = "cpu"
    max_minutes: float | None = None
    save_every: int = 1000
    log_every: int = 100
    resume: bool = True


def preload_split(dataset: ReferDataset, progress: bool = False) -> dict[str, torch.Tensor]:
    """Decode one split into tensors: uint8 images and masks, token ids, and per-pair indices into them."""
    image_ids = sorted({s.image_id for s in dataset.samples})
    ann_ids = sorted({s.ann_id for s in dataset.samples})
    img_pos = {i: k for k, i in enumerate(image_ids)}
    ann_pos = {a: k for k, a in enumerate(ann_ids)}
    with progress_bar(progress, total=len(image_ids), desc="decode images", unit="img") as bar:
        images = []
        for i in image_ids:
            images.append(dataset.pixels(i))
            bar.update(1)
    images = torch.stack(images)
    masks = torch.stack([dataset.target(a) for a in ann_ids])
    input_ids, attention_mask = dataset.tokenizer.batch([s.sentence for s in dataset.samples])
    return {
        "images": images,
        "masks": masks,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_index": torch.tensor([img_pos[s.image_id] for s in dataset.samples]),
        "mask_index": torch.tensor([ann_pos[s.ann_id] for s in dataset.samples]),
    }


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = logits.float().softmax(1)[:, 1].flatten(1)
    t = target.float().flatten(1)
    return (1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)).mean()


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _atomic_torch_save(obj: object, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train and return the path of the weights file (non-text weights, safetensors)."""
    from .outputs import MANIFEST, check_output_folder, write_manifest

    device = resolve_device(cfg.device)  # before anything is written: a machine without CUDA says so first
    out = check_output_folder(cfg.out_dir, "--out", TRAINING_KIND)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST).exists():
        write_manifest(out, TRAINING_KIND)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, pretrained=False)
    mcfg = model.config
    dataset = open_split(cfg.data_root, "shapesref", "unc", "train", mcfg)
    t0 = time.time()
    data = preload_split(dataset, progress=progress)
    logger.info("preloaded %d pairs, %d images in %.1fs", len(dataset), len(data["images"]), time.time() - t0)
    data = {k: v.to(device) for k, v in data.items()}

    model.to(device).train()
    model.text_encoder.requires_grad_(False).eval()
    params = [p for n, p in model.named_parameters() if not n.startswith("text_encoder.")]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sampler = torch.Generator(device="cpu").manual_seed(cfg.seed)
    step, elapsed_before = 0, 0.0
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        load_state_dict_checked(model, ckpt["model"], str(ckpt_path), ignore_missing="text_encoder.")
        opt.load_state_dict(ckpt["optimizer"])
        sampler.set_state(ckpt["sampler"])
        step, elapsed_before = int(ckpt["step"]), float(ckpt["elapsed"])
        logger.info("resumed from %s at step %d", ckpt_path, step)

    use_bf16 = device.type == "cuda"
    n = len(dataset)
    log = open(out / "train_log.jsonl", "a")
    start = time.time()

    def save() -> None:
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
        _atomic_torch_save(
            {
                "model": state,
                "optimizer": opt.state_dict(),
                "sampler": sampler.get_state(),
                "step": step,
                "elapsed": elapsed_before + time.time() - start,
            },
            ckpt_path,
        )

    with progress_bar(progress, total=cfg.steps, initial=step, desc="train", unit="step") as bar:
        while step < cfg.steps:
            elapsed = elapsed_before + time.time() - start
            if cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60:
                logger.warning("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
                break
            progress_frac = step / cfg.steps
            if cfg.max_minutes:
                progress_frac = max(progress_frac, elapsed / (cfg.max_minutes * 60))
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(progress_frac, step, cfg.warmup_steps)
            idx = torch.randint(0, n, (cfg.batch_size,), generator=sampler).to(device)
            images = normalize_image(data["images"][data["image_index"][idx]], mcfg.preprocess)
            target = data["masks"][data["mask_index"][idx]].long()
            ids, am = data["input_ids"][idx], data["attention_mask"][idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                with torch.no_grad():
                    feats = model.encode_text(ids, am)
                logits = model.forward_with_text_features(images, feats, am)
                loss = F.cross_entropy(logits.float(), target) + _dice_loss(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                rec = {"step": step, "loss": float(loss), "lr": opt.param_groups[0]["lr"], "elapsed": elapsed}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{float(loss):.3f}")
            if step % cfg.save_every == 0:
                save()
    save()
    log.close()
    model.eval()
    weights = out / "lavt-tiny.safetensors"
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
    save_state_dict(state, weights, metadata={"model": cfg.model, "steps": str(step)})
    meta_path = Path(cfg.data_root) / "shapesref" / "meta.json"
    info = {
        "train_config": asdict(cfg),
        "steps_done": step,
        "wall_seconds": elapsed_before + time.time() - start,
        "samples_seen": step * cfg.batch_size,
        "train_pairs": n,
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "data": json.loads(meta_path.read_text()) if meta_path.is_file() else None,
    }
    (out / "training.json").write_text(json.dumps(info, indent=1))
    return weights
