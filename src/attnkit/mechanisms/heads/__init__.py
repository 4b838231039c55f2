"""Head mixing: methods that weight or select attention heads (MoH)."""
