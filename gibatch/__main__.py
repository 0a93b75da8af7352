from gibatch.cli import main

if __name__ == "__main__":
    main()
