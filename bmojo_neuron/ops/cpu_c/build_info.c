/* What the build put into the library, for the Python side to report (build.py). */

/* 1 where the library was compiled with OpenMP (its parallel loops run on torch's thread count), 0 where
 * build.py fell back to a build without it (every kernel runs on one thread, with the same results). */
int bmojo_kernels_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
