"""Approximate attention: Routing Transformer, HyperAttention, Combiner, Re-ttention, DeltaLLM."""
