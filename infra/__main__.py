"""Entry point of ``Pulumi.yaml``: the golden-VM program in ``controlplane/vm/gcp_program.py``."""

from controlplane.vm.gcp_program import program

program()
