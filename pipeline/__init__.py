"""moe-distill: MoE-to-MoE knowledge distillation (B-Distill) with Ray Data and Ray Train."""

__version__ = "0.1.0"
