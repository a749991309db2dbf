"""`rtune serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with request batching."""
