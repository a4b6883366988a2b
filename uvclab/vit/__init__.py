"""ViT models: creation (timm DeiT/ViT, T2T-ViT), gating, `Structure`, the MACs calculator, physical export."""
