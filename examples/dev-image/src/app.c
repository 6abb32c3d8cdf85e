#include <stdio.h>
#include <sys/utsname.h>

int main(void) {
    struct utsname u;
    uname(&u);
    printf("hello from a binary compiled lazily inside the toolchain image (%s %s)\n", u.sysname, u.machine);
    return 0;
}
