"""The PT-PEFT training driver: ``python -m ptpeft_kernels.train`` (see ``--help``)."""
