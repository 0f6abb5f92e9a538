"""Everything that touches bytes outside the process: inputs, storage, media tools, temp dirs."""
