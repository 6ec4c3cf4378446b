"""bmcell: grow a labelled library of bone marrow cell images and a classifier together.

This package holds what every service shares: settings, logging, errors, the gRPC
server bootstrap, object storage, Postgres, the taxonomy and the cell classifier
network. Services live in ``services/<name>/`` and import from here.
"""

__version__ = "0.1.0"
