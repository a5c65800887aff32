"""Live job events to SSE clients."""
