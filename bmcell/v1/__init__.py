"""Generated gRPC contracts (``make proto``); edit ``proto/bmcell/v1/*.proto``, not these."""
