"""Dynamic and approximate sparse attention: MoBA, VMoBA, Kinetics, HiP, H2O, SeerAttention, DMA,
HCAM, Landmark and others."""
