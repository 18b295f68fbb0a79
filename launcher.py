"""Start qwen_server: `python launcher.py --help`. The logic lives in qwen_server.launcher.cli."""

from qwen_server.launcher.cli import main

if __name__ == "__main__":
    main()
