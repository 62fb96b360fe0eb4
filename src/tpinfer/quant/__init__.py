"""Quantized weights: formats and their reference math (``formats``), the quantized parallel layers (``layers``)."""
