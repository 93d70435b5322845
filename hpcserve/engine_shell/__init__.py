"""The SGLang-compatible server shell shared by the stand-in engines (the mock and the torch engine).

What makes a process answer like an SGLang server, independent of how it computes tokens: the byte-level
tokenizer and chat template (``tokenizer``), SGLang's OpenAI request checks and logprob shapes
(``oai_protocol``), its error bodies (``errors``), the PD bootstrap rendezvous that carries a prefill's KV to
a decode (``bootstrap``), and a launcher for tests and benchmarks (``launch``). The engines keep only their
models: ``hpcserve.mock`` (a timing model and a KV-cache model), ``hpcserve.torchengine`` (real tensors on
CPU).
"""
