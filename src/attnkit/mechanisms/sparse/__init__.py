"""Dynamic and approximate sparse attention: MoBA, VMoBA, Kinetics, HiP, H2O and others."""
