"""The built-in demo model (`model`) and the tiny random-weight checkpoint builder (`tiny_model`)."""
