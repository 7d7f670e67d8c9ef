"""MANSU workbench: circuit attribution, quantization-permanent unlearning, NF4 analysis.

The package is the core library; ``app.py`` (Gradio), ``workbench.widgets`` (Jupyter) and
``workbench.cli`` are thin faces over it. See ``docs/ARCHITECTURE.md``.
"""

__version__ = "0.1.0"
