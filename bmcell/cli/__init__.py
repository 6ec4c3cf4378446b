"""The ``bmcell`` command line."""
