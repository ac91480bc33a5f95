from distillgate.cli.main import main

main()
