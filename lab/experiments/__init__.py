"""The lab's sweeps: research code outside the package, using its public API only (the scripts in
lab/ run them)."""
