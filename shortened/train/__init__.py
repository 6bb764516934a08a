"""The ZeRO-2 DeepSpeed continued-pretraining trainer (the only package that imports deepspeed)."""
