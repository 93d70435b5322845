"""hpcserve: recipes -> Slurm jobs -> SGLang prefill/decode worker groups behind one router."""

__version__ = "0.1.0"
