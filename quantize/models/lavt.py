"""LAVT ``lavt_one``: text encoder inside the model, multi-modal Swin backbone, SimpleDecoding classifier.

"LAVT: Language-Aware Vision Transformer for Referring Image Segmentation" (Yang et al., CVPR 2022), official code
github ``yz93/LAVT-RIS`` (MIT). Top-level names (``backbone``, ``classifier``, ``text_encoder``) and their order
equal the official checkpoint's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bert import BertModel
from .config import LavtConfig
from .decoder import SimpleDecoding
from .roles import LAVT_ROLES
from .swin import MultiModalSwinTransformer

__all__ = ["LAVT"]


class LAVT(nn.Module):
    """image + sentence -> two-class mask logits at the input resolution.

    ``forward(image, input_ids, attention_mask)``:
        image: (B, 3, S, S) float, ImageNet-normalised, S = ``config.swin.img_size``.
        input_ids: (B, N) token ids, N = ``config.preprocess.max_tokens`` (any N ≤ the BERT positions works).
        attention_mask: (B, N), 1 on real tokens, 0 on padding.
    Returns (B, 2, S, S) logits; the mask is ``argmax(dim=1)``.
    """

    # What each layer is to quantization (modality, block, role, fold groups, program), read by placement, folding
    # and export; on the class so that code holding only the module (an artifact's, a deep copy) finds it.
    layer_roles = LAVT_ROLES

    def __init__(self, config: LavtConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MultiModalSwinTransformer(config)
        self.classifier = SimpleDecoding(8 * config.swin.embed_dim, config.decoder)
        self.text_encoder = BertModel(config.bert_config)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) ids + mask -> word features (B, C_text, N), channels first as the PWAM convs take them."""
        return self.text_encoder(input_ids, attention_mask).transpose(1, 2)

    def forward_with_text_features(
        self, image: torch.Tensor, l_feats: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The vision + fusion + decoder part, given precomputed word features (B, C_text, N)."""
        l_mask = attention_mask.to(l_feats.dtype).unsqueeze(-1)  # B, N, 1
        c1, c2, c3, c4 = self.backbone.forward_intermediates(image, l_feats, l_mask)
        logits = self.classifier(c4, c3, c2, c1)
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_with_text_features(image, self.encode_text(input_ids, attention_mask), attention_mask)
