"""Linear, recurrent and memory layers."""
