"""The command-line tools: ``xent explain``, ``xent plot``, ``xent bench``, ``xent demo``.

They sit on top of the public API (they import ``xent`` like any user would) and need the
``tools`` extra (rich for tables, matplotlib for figures); the losses themselves do not.
"""
