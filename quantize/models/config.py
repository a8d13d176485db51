"""Configuration dataclasses for LAVT (``lavt_one``) and its parts.

Every hyperparameter of the official implementation (github ``yz93/LAVT-RIS``, MIT) is named here with its
official default, so that ``LavtConfig()`` describes the paper's model (Swin-B, window 12, 480x480, BERT-base).
The text encoder's hyperparameters are not restated: transformers' ``BertConfig`` stays their source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import BertConfig
from ..errors import UserError

__all__ = ["DecoderConfig", "LavtConfig", "PreprocessConfig", "PwamConfig", "SwinConfig"]


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise UserError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class SwinConfig:
    """The multi-modal Swin visual encoder (``backbone``).

    Args:
        img_size: side of the square input image in pixels (LAVT resizes every image to it, aspect ignored).
        patch_size: side of the non-overlapping patches of ``patch_embed`` (stride of its conv).
        in_chans: image channels.
        embed_dim: channels of stage 0; stage i has ``embed_dim * 2**i``.
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        window_size: side of the attention windows; feature maps are zero-padded to a multiple of it.
        mlp_ratio: hidden width of each block's MLP relative to the stage width.
        qkv_bias: whether the q/k/v projection has a bias.
        ape: learned absolute position embedding added after ``patch_embed`` (Swin's optional ``ape``). Off in the
            paper's model; on in ``lavt-tiny``, where location and relation expressions need absolute position.
        layer_norm_eps: epsilon of every LayerNorm of the backbone (PyTorch default, as in Swin).
    """

    img_size: int = 480
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ape: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "window_size"):
            _check_positive(name, getattr(self, name))
        if len(self.depths) != len(self.num_heads):
            raise UserError(
                f"depths and num_heads must have one entry per stage, got {len(self.depths)} and {len(self.num_heads)}"
            )
        for i, heads in enumerate(self.num_heads):
            if self.stage_dim(i) % heads:
                raise UserError(f"stage {i} width {self.stage_dim(i)} is not a multiple of its {heads} heads")
        if self.img_size % self.patch_size:
            raise UserError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_dim(self, i: int) -> int:
        return self.embed_dim * 2**i

    def stage_resolution(self, i: int) -> int:
        side = self.img_size // self.patch_size
        for _ in range(i):
            side = (side + 1) // 2
        return side


@dataclass(frozen=True)
class PwamConfig:
    """Pixel-word attention module (``fusion``) and language gate (``res_gate``) after every Swin stage.

    Args:
        num_heads: heads of the pixel-word attention, per stage (LAVT uses 1 everywhere).
        mask_value: magnitude of the additive mask on padded words, ``sim + (value * mask - value)``. LAVT uses 1e4,
            which also stays finite in fp16 (``finfo.min`` turns into -inf there).
        instance_norm_eps: epsilon of the two affine-free InstanceNorms (PyTorch default).
    """

    num_heads: tuple[int, ...] = (1, 1, 1, 1)
    mask_value: float = 1e4
    instance_norm_eps: float = 1e-5


@dataclass(frozen=True)
class DecoderConfig:
    """``SimpleDecoding``: three top-down fusion steps, then a 1x1 conv to two classes.

    Args:
        factor: channel ratio between consecutive stages; the hidden width is ``c4_dims // factor``.
        num_classes: output classes (background, referred object).
        batch_norm_eps: epsilon of the BatchNorms (PyTorch default).
    """

    factor: int = 2
    num_classes: int = 2
    batch_norm_eps: float = 1e-5


@dataclass(frozen=True)
class PreprocessConfig:
    """How an (image, sentence) pair becomes model input; read by data loaders and exporters alike.

    Args:
        mean, std: ImageNet normalisation applied after scaling pixels to [0, 1].
        max_tokens: token ids kept per sentence, special tokens included. LAVT truncates after adding
            ``[CLS]``/``[SEP]``, so a long sentence loses its ``[SEP]``; we do the same.
        lowercase: the tokenizer is uncased.
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_tokens: int = 20
    lowercase: bool = True


@dataclass(frozen=True)
class LavtConfig:
    """The whole ``lavt_one`` model: Swin + PWAM backbone, BERT text encoder, SimpleDecoding classifier.

    Example:
        >>> cfg = LavtConfig()                   # the paper's Swin-B / BERT-base model at 480x480
        >>> cfg.swin.stage_resolution(3)
        15
    """

    swin: SwinConfig = field(default_factory=SwinConfig)
    pwam: PwamConfig = field(default_factory=PwamConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    text: dict[str, Any] = field(default_factory=lambda: BertConfig().to_dict())

    def __post_init__(self) -> None:
        if len(self.pwam.num_heads) != self.swin.num_stages:
            raise UserError(
                f"pwam.num_heads needs one entry per Swin stage ({self.swin.num_stages}), got {len(self.pwam.num_heads)}"
            )

    def __hash__(self) -> int:  # text is a dict, so the generated hash would fail
        return hash((self.swin, self.pwam, self.decoder, self.preprocess, tuple(sorted(self.text.items(), key=str))))

    @property
    def bert_config(self) -> BertConfig:
        return BertConfig.from_dict(self.text)

    @property
    def text_dim(self) -> int:
        return int(self.text["hidden_size"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LavtConfig:
        known = {"swin", "pwam", "decoder", "preprocess", "text"}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"unknown LavtConfig keys {sorted(unknown)}; expected a subset of {sorted(known)}")

        def tuples(d: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        return cls(
            swin=SwinConfig(**tuples(data.get("swin", {}))),
            pwam=PwamConfig(**tuples(data.get("pwam", {}))),
            decoder=DecoderConfig(**tuples(data.get("decoder", {}))),
            preprocess=PreprocessConfig(**tuples(data.get("preprocess", {}))),
            text=dict(data.get("text", BertConfig().to_dict())),
        )
