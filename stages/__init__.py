"""Pipeline stages: one module per DVC stage, each with a ``main()`` entry point."""

CODE_VERSION = "0.1.0"
