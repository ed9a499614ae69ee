"""``python -m aphrodite.env``: prints the version, the backends compiled in and the devices."""

from aphrodite._envinfo import env_info, format_env_info


def main() -> None:
    print(format_env_info(env_info()))


if __name__ == "__main__":
    main()
