"""The jobs of the ``handgrad`` command, one module each: ``train``, ``verify``, ``bench``.

Each has ``main(argv, prog) -> exit code`` (it never calls ``sys.exit``, so tests run it
in-process) and ``build_parser(prog)``; :mod:`handgrad.cli` picks the job by its first word.
"""
