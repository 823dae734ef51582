// Command dial reports, for each host:port argument, whether a TCP
// connection to it opens: "ADDR open", or "ADDR closed: why". The e2e
// test runs it in a container on the models' network, as a model
// container would try vgw's ports.
package main

import (
	"fmt"
	"net"
	"os"
	"time"
)

func main() {
	for _, addr := range os.Args[1:] {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			fmt.Printf("%s closed: %v\n", addr, err)
			continue
		}
		c.Close()
		fmt.Printf("%s open\n", addr)
	}
}
