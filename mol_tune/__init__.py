"""mol_tune: Mixture-of-LoRA (MoL) for torchtune."""
