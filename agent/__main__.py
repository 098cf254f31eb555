from agent.cli import app

if __name__ == "__main__":  # a child process started by spawn imports this module too: no second CLI there
    app()
