"""Command lines of the processes hpcserve starts: one arguments class per process kind.

Each class names its flags and their defaults once; the planner builds an instance and writes it with
``to_argv()``, the process reads it back with ``from_argv()``. ``server.ServerArgs`` is SGLang's
``launch_server`` flag set (sglang, the mock and the torch engine); ``router.RouterArgs`` is
``python -m hpcserve.router``'s, whose policy defaults are also the recipe's; ``agent.AgentArgs`` is the node
agent's (``hpcserve node``) and ``batch.BatchArgs`` the batch driver's (``python -m hpcserve.batch``).
"""
