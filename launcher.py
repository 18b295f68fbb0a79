"""Start qwen_server: `python launcher.py --help`. The logic lives in qwen_server.cli."""

from qwen_server.cli import main

if __name__ == "__main__":
    main()
