from sd35trt.cli.main import entry

entry()
