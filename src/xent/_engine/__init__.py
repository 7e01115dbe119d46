"""The engine behind every output-layer loss (private; the public modules call it).

* :mod:`~xent._engine.options`: the options of one call (:class:`CEParams`);
* :mod:`~xent._engine.dispatch`: the one backend dispatcher (``IMPLS``, ``resolve``,
  ``row_pass``);
* :mod:`~xent._engine.torch_rows` and :mod:`~xent._engine.triton_rows`: the one-pass
  cross-entropy kernel in torch and in Triton, same contract;
* :mod:`~xent._engine.rows`: row kernels in the walker's contract;
* :mod:`~xent._engine.walker`: the chunk walker over ``hidden × head weight``;
* :mod:`~xent._engine.parallel`: vocabulary parallelism (layout, global statistics, DTensor);
* :mod:`~xent._engine.autograd`: the autograd Functions; :mod:`~xent._engine.compile`: the
  ``torch.compile`` custom operators;
* :mod:`~xent._engine.policy`: the engine's decisions, each in one place.

Dependencies point one way: public modules → engine → :mod:`xent._numerics` and
:mod:`xent._validation`. ``docs/architecture.md`` draws the layers and the data flow.
"""
