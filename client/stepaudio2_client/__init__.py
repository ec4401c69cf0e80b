"""Thin gRPC client for the Step-Audio-2 Triton service. Imports tritonclient and numpy only (no torch)."""

from stepaudio2_client.client import ClientError, StepAudio2Client
from stepaudio2_client.session import Session
from stepaudio2_client.tools import WEB_SEARCH_SCHEMA, ToolRegistry, WebSearchTool

__all__ = ["ClientError", "Session", "StepAudio2Client", "ToolRegistry", "WEB_SEARCH_SCHEMA", "WebSearchTool"]
