"""Board profiles (data files) and what runs on a board, shipped as `edgeft.devices`."""
