"""The sandbox episode runner: tasks in, agents at the recording proxy, rewards out."""
