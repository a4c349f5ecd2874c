"""Our own streaming forward pass for Kyutai STT (the CPU runtime).

Only what speech-to-text needs: Mimi's encoder side (``mimi.py``) and the LM with its text and
end-of-turn heads (``lm.py``), read straight from the checkpoint's safetensors files
(``weights.py``), with int8 or float32 matrix products (``linear.py``). All streaming state is
explicit and has a slot dimension: a step touches only the slots it is given, and a slot is
reset on its own. moshi is not imported here; the tests compare against it.
"""
