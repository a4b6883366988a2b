"""The faces over the library: the command line, figures, and the ipywidgets explorer."""
